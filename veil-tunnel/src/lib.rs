//! What both ends of a veil tunnel do the same way, without the datapath:
//! the profile a client carries, TLS 1.3 with mutual authentication, the
//! TUN device with offload, and the [`stream::Stream`] that both pumps
//! run on (reads and writes together, with deadlines), and [`ws`], the
//! same stream carried in a WebSocket behind a web server.
//!
//! The client depends on this and on `veil-proto` only; the gateway
//! (`veil-user`) adds the datapath, the flow table and the registry.

pub mod busy;
pub mod net;
pub mod profile;
pub mod pump;
pub mod quic;
pub mod stream;
pub mod tls;
pub mod tun;
pub mod ws;

/// Logs to stderr through tracing, `RUST_LOG` filtering (default `info`);
/// in colour only on a terminal, so that journald and log files get plain
/// text.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
