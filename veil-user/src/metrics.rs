//! Prometheus metrics (`--metrics [ADDR:]PORT`): `GET /metrics` in the
//! text exposition format, made from the same snapshot `veil-user status`
//! shows.
//!
//! No series names a client. Metrics are scraped over the network and kept
//! for months in a time-series database: per-client series there would be
//! a record of who used this anonymizing gateway, when and how much. The
//! metrics are aggregates; per-client detail is in `veil-user status`,
//! which only root can ask (its socket is 0600) and which keeps no history.
//!
//! Served on loopback unless an address is given, a few connections at a
//! time, each with one deadline for reading the request and writing the
//! answer: a scraper that connects and says nothing delays no other.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use crate::control::Status;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time one connection gets for its request and the answer, together.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a rendered page is served again: the status walks every
/// flow, and scrapers (or anyone who reaches an exposed port) asking in a
/// loop would have it walk the tables back to back.
const PAGE_TTL: Duration = Duration::from_secs(1);

/// `--metrics` and the `metrics` key: `PORT` alone means 127.0.0.1:PORT,
/// so exposing the metrics beyond this machine takes an explicit address.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("`{s}` is not PORT (served on 127.0.0.1) or ADDR:PORT, e.g. 9477 or 0.0.0.0:9477")
    })
}

/// Renders a status snapshot as Prometheus metrics.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        name.to_owned()
    };
    let mut lines: Vec<String> = Vec::new();

    let n = family("veil_clients", "gauge", "Clients connected now.");
    lines.push(format!("{n} {}", s.clients.len()));
    let flows = family(
        "veil_flows",
        "gauge",
        "Flows in the NAT maps, by protocol (IPv4: tcp, udp, icmp; all IPv6 flows: ipv6).",
    );
    let bytes = family(
        "veil_connected_clients_bytes",
        "gauge",
        "IP bytes through the tunnels of the clients connected now, summed, by direction (falls when a client leaves).",
    );
    let dp_packets = family(
        "veil_datapath_packets_total",
        "counter",
        "Packets the eBPF datapath handled, by reason code.",
    );
    let dp_bytes = family(
        "veil_datapath_bytes_total",
        "counter",
        "Bytes the eBPF datapath handled, by reason code.",
    );
    let drops = family(
        "veil_gateway_drops_total",
        "counter",
        "Client packets the daemon refused or dropped, by cause.",
    );
    let refused = family(
        "veil_handshake_failures_total",
        "counter",
        "Connections refused before a session, by cause.",
    );
    let ports = family(
        "veil_nat_ports_in_use",
        "gauge",
        "Distinct NAT ports used by some flow, per NAT port range.",
    );
    let fwd_conns = family(
        "veil_forward_connections_total",
        "counter",
        "Connections made by a port forwarding rule.",
    );
    let fwd_packets = family(
        "veil_forward_packets_total",
        "counter",
        "Packets forwarded by a port forwarding rule, both directions.",
    );
    let fwd_bytes = family(
        "veil_forward_bytes_total",
        "counter",
        "Bytes forwarded by a port forwarding rule, both directions.",
    );
    let fwd_evicted = family(
        "veil_forward_evicted_total",
        "counter",
        "Connections of a port forwarding rule ended before they were assured, for newer ones.",
    );
    for f in &s.forwards {
        let rule = &f.rule;
        lines.push(format!("{fwd_conns}{{rule=\"{rule}\"}} {}", f.connections));
        lines.push(format!("{fwd_evicted}{{rule=\"{rule}\"}} {}", f.evicted));
        lines.push(format!("{fwd_packets}{{rule=\"{rule}\"}} {}", f.packets));
        lines.push(format!("{fwd_bytes}{{rule=\"{rule}\"}} {}", f.bytes));
    }
    for (proto, count) in [
        ("tcp", s.flows.tcp),
        ("udp", s.flows.udp),
        ("icmp", s.flows.icmp),
        ("ipv6", s.flows.ipv6),
    ] {
        lines.push(format!("{flows}{{proto=\"{proto}\"}} {count}"));
    }
    let (from, to) = s.clients.iter().fold((0u64, 0u64), |(f, t), c| {
        (
            f.saturating_add(c.bytes_from_client),
            t.saturating_add(c.bytes_to_client),
        )
    });
    lines.push(format!("{bytes}{{direction=\"from_client\"}} {from}"));
    lines.push(format!("{bytes}{{direction=\"to_client\"}} {to}"));
    let queued = family(
        "veil_replies_queued_bytes",
        "gauge",
        "Bytes of replies waiting in the clients' queues for their sessions to send, all clients together (each up to --client-buffer; per client in `veil-user status`).",
    );
    let waiting = s
        .clients
        .iter()
        .fold(0u64, |sum, c| sum.saturating_add(c.replies_queued));
    lines.push(format!("{queued} {waiting}"));
    let ipv6 = family(
        "veil_connected_clients_ipv6",
        "gauge",
        "Clients connected now with an IPv6 address through the tunnel (--pool6); their addresses are in `veil-user status`.",
    );
    let leased6 = s.clients.iter().filter(|c| c.vip6.is_some()).count();
    lines.push(format!("{ipv6} {leased6}"));
    let limited = family(
        "veil_limited_clients",
        "gauge",
        "Clients connected now held to a rate limit or a quota, by limit, and those whose quota is used up (their drops: veil_datapath_packets_total{reason=\"drop_rate_limited\"} and {reason=\"drop_quota_exceeded\"}).",
    );
    let count = |f: &dyn Fn(&crate::control::ClientStatus) -> bool| {
        s.clients.iter().filter(|c| f(c)).count()
    };
    lines.push(format!(
        "{limited}{{limit=\"rate\"}} {}",
        count(&|c| c.rate_limit.is_some())
    ));
    lines.push(format!(
        "{limited}{{limit=\"quota\"}} {}",
        count(&|c| c.quota.is_some())
    ));
    lines.push(format!(
        "{limited}{{limit=\"quota_used_up\"}} {}",
        count(&|c| c.quota.is_some_and(|q| c.quota_used >= q))
    ));
    for (reason, c) in &s.datapath {
        lines.push(format!("{dp_packets}{{reason=\"{reason}\"}} {}", c.packets));
        lines.push(format!("{dp_bytes}{{reason=\"{reason}\"}} {}", c.bytes));
    }
    for (cause, n) in &s.counters {
        lines.push(format!("{drops}{{cause=\"{cause}\"}} {n}"));
    }
    for cause in [
        "tls",
        "timeout",
        "unknown_client",
        "revoked",
        "full",
        "internal",
    ] {
        let n = s.refused.get(cause).copied().unwrap_or(0);
        lines.push(format!("{refused}{{cause=\"{cause}\"}} {n}"));
    }
    lines.push(format!(
        "{ports}{{range=\"{}\"}} {}",
        s.flows.nat_ports, s.flows.nat_ports_in_use
    ));
    // HELP/TYPE lines first, then the samples: valid for Prometheus, which
    // groups samples by name.
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` until dropped (dropping it also drops the
/// connections in progress).
pub async fn serve(listener: TcpListener, snapshot: impl Fn() -> Status) -> Result<()> {
    serve_with(listener, snapshot, REQUEST_DEADLINE).await
}

/// A connection's request for the page, answered by the serving loop,
/// which alone holds `snapshot` (it may borrow the gateway's state).
type PageRequest = oneshot::Sender<String>;

async fn serve_with(
    listener: TcpListener,
    snapshot: impl Fn() -> Status,
    deadline: Duration,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (ask, mut asked) = mpsc::channel::<PageRequest>(MAX_CONNECTIONS);
    let mut connections = JoinSet::new();
    let mut page: Option<(Instant, String)> = None;
    loop {
        tokio::select! {
            Some(reply) = asked.recv() => {
                let fresh = page.as_ref().filter(|(at, _)| at.elapsed() < PAGE_TTL);
                let body = match fresh {
                    Some((_, body)) => body.clone(),
                    None => {
                        let body = render(&snapshot());
                        page = Some((Instant::now(), body.clone()));
                        body
                    }
                };
                let _ = reply.send(body);
            }
            // A slot first: with every slot taken, scrapers wait in the
            // kernel's backlog, for one deadline at most.
            (accepted, slot) = accept_with_slot(&listener, &slots) => match accepted {
                Ok((stream, _)) => {
                    let ask = ask.clone();
                    connections.spawn(async move {
                        // Past the deadline the connection is dropped.
                        let _ = tokio::time::timeout(deadline, answer(stream, ask)).await;
                        drop(slot);
                    });
                }
                Err(e) => crate::net::accept_failed("metrics socket", &e).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Waits for a free slot, then for a connection. Cancel-safe: dropped
/// while waiting, it takes neither.
async fn accept_with_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (
    std::io::Result<(TcpStream, SocketAddr)>,
    OwnedSemaphorePermit,
) {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    (listener.accept().await, slot)
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, ask: mpsc::Sender<PageRequest>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let response = if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") {
        let (reply, page) = oneshot::channel();
        if ask.send(reply).await.is_err() {
            return;
        }
        let Ok(body) = page.await else {
            return;
        };
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        let body = "veil exposes GET /metrics only\n";
        format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClientStatus, PacketCount};

    fn client(name: &str, from: u64, to: u64) -> ClientStatus {
        ClientStatus {
            name: name.into(),
            vip: "10.77.0.2".parse().unwrap(),
            vip6: None,
            peer: Some("10.200.1.2:5000".into()),
            connected_since: 0,
            bytes_from_client: from,
            bytes_to_client: to,
            rate_limit: Some("50mbit".into()),
            quota: None,
            quota_used: 0,
            rate_dropped: 0,
            quota_dropped: 0,
            replies_queued: 0,
        }
    }

    #[test]
    fn renders_every_family_with_labels() {
        let mut s = Status::default();
        s.flows.tcp = 2;
        s.flows.nat_ports = "61000-65535".into();
        s.flows.nat_ports_in_use = 2;
        s.clients.push(client("alice", 10, 20));
        s.clients.push(client("bob", 1, 2));
        s.clients[1].vip6 = Some("fd00:7665:696c::a4d:3".parse().unwrap());
        s.datapath.insert(
            "egress_forwarded".into(),
            PacketCount {
                packets: 3,
                bytes: 300,
            },
        );
        s.counters.insert("forged_source".into(), 1);
        s.refused.insert("revoked".into(), 4);
        let text = render(&s);
        for line in [
            "veil_clients 2",
            "veil_connected_clients_ipv6 1",
            "veil_flows{proto=\"tcp\"} 2",
            "veil_connected_clients_bytes{direction=\"from_client\"} 11",
            "veil_connected_clients_bytes{direction=\"to_client\"} 22",
            "veil_datapath_packets_total{reason=\"egress_forwarded\"} 3",
            "veil_gateway_drops_total{cause=\"forged_source\"} 1",
            "veil_handshake_failures_total{cause=\"revoked\"} 4",
            "veil_handshake_failures_total{cause=\"tls\"} 0",
            "veil_nat_ports_in_use{range=\"61000-65535\"} 2",
            "# TYPE veil_datapath_bytes_total counter",
            "# TYPE veil_connected_clients_bytes gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn no_client_is_named() {
        let mut s = Status::default();
        s.clients.push(client("alice", 10, 20));
        s.clients[0].vip6 = Some("fd00:7665:696c::a4d:2".parse().unwrap());
        let text = render(&s);
        assert!(!text.contains("alice"), "{text}");
        assert!(!text.contains("fd00:7665"), "{text}");
        assert!(!text.contains("client="), "{text}");
        assert!(
            !text.contains("10.77.0.2") && !text.contains("10.200.1.2"),
            "{text}"
        );
    }

    #[test]
    fn a_port_alone_means_loopback() {
        assert_eq!(parse_addr("9477"), Ok("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(
            parse_addr("0.0.0.0:9477"),
            Ok("0.0.0.0:9477".parse().unwrap())
        );
        let err = parse_addr("localhost").unwrap_err();
        assert!(
            err.contains("PORT (served on 127.0.0.1) or ADDR:PORT"),
            "{err}"
        );
    }

    async fn scrape(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }

    async fn server(deadline: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_with(listener, Status::default, deadline));
        addr
    }

    #[tokio::test]
    async fn a_silent_connection_does_not_hold_up_a_scrape() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Status::default));
        let mut silent: Vec<TcpStream> = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let text = tokio::time::timeout(Duration::from_secs(1), scrape(addr))
            .await
            .expect("answered while the silent connections wait");
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("veil_clients 0"), "{text}");
        drop(silent);
    }

    #[tokio::test]
    async fn a_silent_connection_is_dropped_at_the_deadline() {
        let addr = server(Duration::from_millis(200)).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut buf))
            .await
            .expect("closed by the server's deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // Its slot is free again: every slot can still be used.
        for _ in 0..MAX_CONNECTIONS + 1 {
            let text = tokio::time::timeout(Duration::from_secs(1), scrape(addr))
                .await
                .expect("answered");
            assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        }
    }

    #[tokio::test]
    async fn scrapes_in_a_loop_build_the_status_once_a_second() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let built = Arc::new(AtomicUsize::new(0));
        let counted = built.clone();
        tokio::spawn(serve(listener, move || {
            counted.fetch_add(1, Relaxed);
            Status::default()
        }));
        for _ in 0..20 {
            assert!(scrape(addr).await.contains("veil_clients 0"));
        }
        assert_eq!(built.load(Relaxed), 1, "one status for 20 scrapes");
        tokio::time::sleep(PAGE_TTL).await;
        scrape(addr).await;
        assert_eq!(built.load(Relaxed), 2, "a new one after a second");
    }

    #[tokio::test]
    async fn anything_but_get_metrics_is_404() {
        let addr = server(REQUEST_DEADLINE).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found"), "{text}");
    }
}
