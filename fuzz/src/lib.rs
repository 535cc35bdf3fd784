//! What the fuzz targets share: a heap meter for "never allocates
//! unboundedly", a deterministic splitter for "bytes arriving in arbitrary
//! pieces", an RFC 1071 checksum written independently of veil's, the
//! properties every emitted IPv4 packet must have, packet builders, and the
//! seed corpus (`cargo xtask fuzz --seeds` writes it with the `seeds`
//! example).
//!
//! Everything here panics on a broken property: in a fuzz target a panic is
//! the finding.

pub mod heap;
// veil-user's pure packet checks, compiled from its own source files: the
// `client_packet` target reaches them as `veil_fuzz::veil_user::*`.
pub mod gro_ops;
pub mod ip;
#[path = "../../veil-user/src/net.rs"]
pub mod net;
#[path = "../../veil-user/src/packet.rs"]
pub mod packet;
#[path = "../../veil-user/src/policy.rs"]
pub mod policy;
pub mod rng;
pub mod seeds;

pub use rng::Rng;

/// The pieces of veil-user the targets check, by their veil-user paths.
pub mod veil_user {
    pub use crate::{net, packet, policy};
}
