//! The veil gateway daemon as a library: the datapath loader and the flow
//! table that the session layer drives, and that the tests and benchmarks
//! use directly.

pub mod admission;
pub mod config;
pub mod control;
pub mod datapath;
pub mod flows;
pub mod gateway;
pub mod metrics;
pub mod nat;
pub mod net;
pub mod packet;
pub mod policy;
pub mod preflight;
pub mod queue;
pub mod size;
pub mod state;
pub mod stream;
pub mod tls;
pub mod tun;

pub use datapath::{Datapath, DatapathConfig, DatapathError};
pub use flows::{FlowError, FlowTable, PortRange, Timeouts};

/// Logs to stderr through tracing, `RUST_LOG` filtering (default `info`);
/// `log` records (aya-log's, from the datapath) are bridged in.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
