//! Everything veil's datapath and daemon must agree on, in one place: the
//! layouts of the BPF maps, the reason codes the datapath counts packets
//! under, and the pure checksum arithmetic the rewrite uses.
//!
//! Map types are `#[repr(C)]` with explicit padding so that the eBPF object,
//! the daemon and `bpftool` (through BTF) read the same bytes the same way.
//! Addresses are kept as the four bytes of the wire (`bpftool` prints them as
//! `[198,18,0,1]`); ports and identifiers are host-order `u16`, so `bpftool`
//! prints `443`, not `47873`.

#![no_std]

pub mod csum;
pub mod forward;
pub mod maps;
pub mod maps6;
pub mod normalize;
pub mod ratelimit;
pub mod reason;
pub mod steer;

pub use forward::*;
pub use maps::*;
pub use maps6::*;
pub use reason::Reason;
