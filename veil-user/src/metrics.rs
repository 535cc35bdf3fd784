//! Prometheus metrics (`--metrics ADDR`): `GET /metrics` in the text
//! exposition format, made from the same snapshot `veil-user status` shows.

use std::fmt::Write as _;

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::control::Status;

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
    let flows = family("veil_flows", "gauge", "Flows in the NAT maps, by protocol.");
    let bytes = family(
        "veil_client_bytes_total",
        "counter",
        "IP bytes through each connected client's tunnel, by direction.",
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
    for (proto, count) in [
        ("tcp", s.flows.tcp),
        ("udp", s.flows.udp),
        ("icmp", s.flows.icmp),
    ] {
        lines.push(format!("{flows}{{proto=\"{proto}\"}} {count}"));
    }
    for c in &s.clients {
        let client = escape(&c.name);
        lines.push(format!(
            "{bytes}{{client=\"{client}\",direction=\"from_client\"}} {}",
            c.bytes_from_client
        ));
        lines.push(format!(
            "{bytes}{{client=\"{client}\",direction=\"to_client\"}} {}",
            c.bytes_to_client
        ));
    }
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

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` until dropped.
pub async fn serve(listener: TcpListener, snapshot: impl Fn() -> Status) -> Result<()> {
    loop {
        // Out of file descriptors and the like: wait, keep serving; the
        // gateway itself must not stop over its status socket.
        let (mut stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept on the metrics socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf))
            .await
            .unwrap_or(Ok(0))
            .unwrap_or(0);
        let request = String::from_utf8_lossy(&buf[..n]);
        let response = if request.starts_with("GET /metrics ")
            || request.starts_with("GET /metrics?")
        {
            let body = render(&snapshot());
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
        let _ = stream.write_all(response.as_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClientStatus, PacketCount};

    #[test]
    fn renders_every_family_with_labels() {
        let mut s = Status::default();
        s.flows.tcp = 2;
        s.flows.nat_ports = "61000-65535".into();
        s.flows.nat_ports_in_use = 2;
        s.clients.push(ClientStatus {
            name: "al\"ice".into(),
            vip: "10.77.0.2".parse().unwrap(),
            peer: "10.200.1.2:5000".into(),
            connected_since: 0,
            bytes_from_client: 10,
            bytes_to_client: 20,
        });
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
            "veil_clients 1",
            "veil_flows{proto=\"tcp\"} 2",
            "veil_client_bytes_total{client=\"al\\\"ice\",direction=\"to_client\"} 20",
            "veil_datapath_packets_total{reason=\"egress_forwarded\"} 3",
            "veil_gateway_drops_total{cause=\"forged_source\"} 1",
            "veil_handshake_failures_total{cause=\"revoked\"} 4",
            "veil_handshake_failures_total{cause=\"tls\"} 0",
            "veil_nat_ports_in_use{range=\"61000-65535\"} 2",
            "# TYPE veil_datapath_bytes_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
