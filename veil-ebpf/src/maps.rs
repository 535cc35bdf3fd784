//! The maps, named as user space and `bpftool` see them.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use veil_common::{
    reason::REASON_SLOTS, Config, Counter, EgressFlow, FlowKey, FragEntry, FragKey, Reason,
    ReverseFlow, ReverseKey, MAX_FLOWS, MAX_FRAGS,
};

#[btf_map]
pub static VEIL_EGRESS: HashMap<FlowKey, EgressFlow, { MAX_FLOWS as usize }> = HashMap::new();

#[btf_map]
pub static VEIL_REVERSE: HashMap<ReverseKey, ReverseFlow, { MAX_FLOWS as usize }> = HashMap::new();

#[btf_map]
pub static VEIL_CONFIG: Array<Config, 1> = Array::new();

#[btf_map]
pub static VEIL_STATS: PerCpuArray<Counter, { REASON_SLOTS as usize }> = PerCpuArray::new();

/// LRU, unlike the flow maps: its entries are the datapath's alone, short
/// lived, and an evicted one costs one datagram at most.
#[btf_map]
pub static VEIL_FRAGS: LruHashMap<FragKey, FragEntry, { MAX_FRAGS as usize }> = LruHashMap::new();

/// The daemon's configuration; without it nothing is translated. An array
/// slot always exists, zeroed until written: no public address means the
/// daemon has not configured the datapath.
#[inline(always)]
pub fn config() -> Result<&'static Config, Reason> {
    match VEIL_CONFIG.get(0) {
        Some(cfg) if cfg.public_count != 0 => Ok(cfg),
        _ => Err(Reason::DropNotConfigured),
    }
}
