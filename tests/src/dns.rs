//! A tiny authoritative DNS server for tests: answers A queries for the
//! names it is given, NOERROR without data for other types of those names,
//! NXDOMAIN for the rest; notes who asked what. UDP only, one thread,
//! stopped on drop.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{rdata::A, Name, RData, Record, RecordType},
};

use crate::netns::NetNs;

/// The bytes of a standard query for `name`'s A records, numbered `id`,
/// recursion desired: what a stub resolver sends.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).expect("a domain name"),
        RecordType::A,
    ));
    q.to_vec().expect("a query encodes")
}

pub struct DnsServer {
    /// (who asked, the name asked), in order.
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    /// Serves on `addr` port 53 inside `ns`.
    pub fn start(ns: &NetNs, addr: Ipv4Addr, names: &[(&str, Ipv4Addr)]) -> Self {
        let socket = ns.enter(|| UdpSocket::bind((addr, 53)).expect("binding port 53"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let names: HashMap<Name, Ipv4Addr> = names
            .iter()
            .map(|(n, a)| (Name::from_ascii(n).unwrap(), *a))
            .collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first() else {
                    continue;
                };
                s.lock().unwrap().push((from, q.name().to_ascii()));
                let mut answer =
                    Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                answer.metadata.authoritative = true;
                answer.queries = query.queries.clone();
                let mut fqdn = q.name().clone();
                fqdn.set_fqdn(true);
                match names.get(&fqdn) {
                    Some(addr) if q.query_type() == RecordType::A => answer
                        .answers
                        .push(Record::from_rdata(q.name().clone(), 60, RData::A(A(*addr)))),
                    Some(_) => {}
                    None => answer.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        DnsServer { seen, stop }
    }

    /// Who asked, and for which name.
    pub fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
