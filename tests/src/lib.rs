//! Support for veil's kernel tests: packets built and checked by code that
//! shares nothing with the datapath, and network namespaces that clean up
//! after themselves.

pub mod bed;
pub mod bpffs;
pub mod netns;
pub mod packet;
pub mod peers;
pub mod proc;
pub mod world;
