//! The veil gateway daemon as a library: the datapath loader and the flow
//! table that the session layer drives, and that the tests and benchmarks
//! use directly.

pub mod admission;
pub mod control;
pub mod crl;
pub mod datapath;
pub mod dns;
pub mod flows;
pub mod flows6;
pub mod forward;
pub mod gateway;
pub mod gro_stage;
pub mod metrics;
pub mod nat;
pub mod net;
pub mod policy;
pub mod policy6;
pub mod pool6;
pub mod preflight;
pub mod qr;
pub mod queue;
pub mod ratelimit;
pub mod settings;
pub mod size;
pub mod slice;
pub mod state;

pub use datapath::{Datapath, DatapathConfig, DatapathError};
pub use flows::{FlowError, FlowTable, PortRange, Timeouts};

pub use veil_proto::packet;
pub use veil_tunnel::{init_logging, stream, tls, tun};
